"""Evaluation metrics: InPro (Q16 + NudeNet), FID, CLIPScore, VLM-judge pass and win rates, reports.

One module per job: ``images`` (image folders), ``q16`` / ``nudenet`` (classifiers) and ``inpro``
(their OR), ``fid``, ``clip`` / ``clipscore``, ``judge``, ``stats`` (Wilson intervals),
``prompts`` (the prompts file), ``report`` (result rows, CSV, table, chart) and ``evaluation``
(the run behind ``evaluate.py``). Modules are imported on use, so ``import psalign.metrics``
stays light.
"""
