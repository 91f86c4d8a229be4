"""The medimg ingest service."""
