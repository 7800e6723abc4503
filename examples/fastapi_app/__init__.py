"""Example FastAPI service on kitium-pg: sign-up, login, 2FA, API keys, organizations and RBAC.

Run it with ``python -m examples.fastapi_app`` (see README.md beside this file).
"""
