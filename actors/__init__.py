"""Ray actors of the control plane and the gRPC servicers they host."""
