"""The `medimg` command and the local platform launcher."""
