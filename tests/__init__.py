"""The test suite (a package, so that its folders never shadow the product's packages: tests/ledger is tests.ledger, not ledger)."""
