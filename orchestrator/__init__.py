"""The sweep engine: CLI, search-space compiler, sweep runner, MLflow tracking, reports, stats."""
