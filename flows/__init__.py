"""Prefect flows and the CLI: orchestration only. Stages live in their own packages.

Prefect is configured here to run quietly and offline: without PREFECT_API_URL it starts its temporary
local server; analytics are off. Building never touches the Hub (`kvqa build` sets HF_HUB_OFFLINE);
only `kvqa publish` talks to it.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The temporary server gets 20 s to start by default; on a loaded 2-core machine it can take longer, and
# a build must not fail for that.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
