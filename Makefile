# The two commands a new user needs (see README.md):
#   make up    set up, then run the platform with a short demo, until Ctrl-C
#   make test  set up, then run every check and test
.PHONY: up test setup check pytest down status

up: setup
	.venv/bin/medimg up --demo

test: setup check pytest

setup:
	scripts/setup.sh

check:
	scripts/check.sh

pytest:
	.venv/bin/python -m pytest -q

down:
	.venv/bin/medimg down

status:
	.venv/bin/medimg status
