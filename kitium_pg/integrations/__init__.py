"""Optional integrations with web frameworks (each behind its own extra).

- ``kitium_pg.integrations.fastapi`` (extra ``fastapi``): lifespan, storage dependency, session,
  API key and permission dependencies for FastAPI.
- ``kitium_pg.integrations.fastapi_users`` (extra ``fastapi``, plus ``fastapi-users``): a
  ``BaseUserDatabase`` for fastapi-users backed by kitium-pg.

Nothing here is imported by ``kitium_pg`` itself: the core package works without these extras.
"""
