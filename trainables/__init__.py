"""Model families. A family is declared by its YAML (``search_spaces/<family>.yaml``, or a user's
own folder; see ``orchestrator.registry``), which names its code with
``entrypoint: module.path:function``. That function is

    train(config: dict, report: Callable[[dict, dict | None], None], restore: dict | None = None) -> None

and trains and evaluates one configuration. It calls ``report(metrics, checkpoint=None)`` once
per epoch (metrics include ``epoch``; names follow ``<split>/<method>/<metric>``, see
``trainables.common.metrics``); ``checkpoint`` is a dict of torch-saveable state, handed back as
``restore`` when a trial resumes. The last report holds the final (test) metrics. A diverged
trial reports ``diverged: 1.0`` and returns. Families know nothing of Ray, MLflow or the CLI.

The module may also define ``check(config: dict) -> None`` raising
``trainables.common.checks.ConfigError`` for a config ``train`` would refuse (cross-field rules
such as ``embed_dim % heads``); the compiler runs it on every trial config before anything
starts (a YAML key ``check: module.path:function`` names another function instead), and
``INVALID_CONFIGS``, a list of overrides ``check`` must refuse, which the conformance suite
(``tests/test_conformance.py``) holds it to.

The shipped families build ``train`` on ``trainables.common.lifecycle.Trial``, which owns what
every trial repeats (seeding, capture and restore of every RNG, the checkpoint snapshot, the
guard against resuming a finished trial, the divergence report, timing, the reliability-diagram
artifact), so a resumed run reports exactly what an uninterrupted one does. A family of your own
may use it too (``docs/own_family.md``), or not: the contract above is all the engine relies on.
"""
