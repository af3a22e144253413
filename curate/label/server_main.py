"""Entry point of the local Argilla service; runs with the server venv's Python, not ours.

    .venv-argilla/bin/python curate/label/server_main.py --host 127.0.0.1 --port 6900 [--reindex]

Configuration comes from the ARGILLA_* environment the launcher (`curate/label/server.py`) sets. Steps:
register the osmem search engine, migrate the database (alembic, programmatically: the server's CLI is
not used), make sure the owner user exists with the API key in $CURATE_ARGILLA_OWNER_KEY, rebuild the
search index from the database when the emulator was (re)started empty, then serve `argilla_server:app`
under uvicorn. This file imports nothing from `curate` (whose dependencies are not in this venv).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import osmem_engine  # noqa: E402,F401  (registers the `osmem-opensearch` engine)


def migrate_database() -> None:
    import alembic.config
    from argilla_server.database import ALEMBIC_CONFIG_FILE

    alembic.config.main(argv=["-q", "-c", ALEMBIC_CONFIG_FILE, "upgrade", "head"])


async def ensure_owner(username: str, password: str, api_key: str, workspace: str) -> None:
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole, Workspace
    from sqlalchemy import select

    async with AsyncSessionLocal() as session:
        user = await accounts.get_user_by_username(session, username)
        if user is not None:
            if user.api_key != api_key:
                user.api_key = api_key
                await session.commit()
            return
        found = (await session.execute(select(Workspace).filter_by(name=workspace))).scalar_one_or_none()
        if found is None:
            found = Workspace(name=workspace)
            session.add(found)
            await session.flush()
        await User.create(
            session,
            first_name=username,
            username=username,
            role=UserRole.owner,
            password_hash=accounts.hash_password(password),
            api_key=api_key,
            workspaces=[found],
        )


async def reindex_everything() -> int:
    """Recreate every dataset's index and index its records (with responses and suggestions)."""
    from argilla_server.cli.search_engine.reindex import Reindexer
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.search_engine import get_search_engine

    count = 0
    async with AsyncSessionLocal() as session:
        async for search_engine in get_search_engine():
            datasets = [dataset async for dataset in Reindexer.reindex_datasets(session, search_engine)]
            for dataset in datasets:
                async for records in Reindexer.reindex_dataset_records(session, search_engine, dataset):
                    count += len(records)
    return count


async def prepare(reindex: bool) -> None:
    from argilla_server.database import async_engine

    await ensure_owner(
        username=os.environ.get("CURATE_ARGILLA_OWNER", "owner"),
        password=os.environ["CURATE_ARGILLA_OWNER_PASSWORD"],
        api_key=os.environ["CURATE_ARGILLA_OWNER_KEY"],
        workspace=os.environ.get("CURATE_ARGILLA_WORKSPACE", "curate"),
    )
    if reindex:
        indexed = await reindex_everything()
        print(f"reindexed {indexed} records", flush=True)
    # Pooled connections belong to this event loop; uvicorn starts its own.
    await async_engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reindex", action="store_true")
    args = parser.parse_args()

    migrate_database()
    asyncio.run(prepare(args.reindex))

    import uvicorn

    uvicorn.run("argilla_server:app", host=args.host, port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
