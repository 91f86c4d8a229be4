"""The medimg audit service."""
