"""PostgreSQL access through asyncpg: migrations, repositories, the group-commit writer,
and the embedded PostgreSQL used when no DATABASE_URL is given."""
