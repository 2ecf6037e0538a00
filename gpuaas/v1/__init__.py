"""Generated from proto/gpuaas/v1 by gpuaas.codegen. Do not edit."""
