"""The medimg training service."""
