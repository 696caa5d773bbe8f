"""The Prefect flows: the pipeline (``flows.pipeline``) and the ablation
(``flows.ablation``). They compose the tasks of ``tasks/``; the command line is ``cli/``."""
