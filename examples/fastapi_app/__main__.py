"""``python -m examples.fastapi_app``: start the example service (see README.md)."""

from .main import main

main()
