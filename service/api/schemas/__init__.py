"""API schemas, the `XCreate / XPublic / XsPublic` family; converted to domain inputs in one place each."""
