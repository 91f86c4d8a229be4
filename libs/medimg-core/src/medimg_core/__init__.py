"""The medimg platform library: what every service stands on, written once."""
