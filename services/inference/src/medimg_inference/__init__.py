"""The medimg inference service."""
