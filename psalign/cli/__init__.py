"""The command-line programs. Each module's ``main(argv) -> exit status`` backs a root script and
an installed command, so ``python infer.py ...`` and ``psalign-infer ...`` run the same code:

=======================  ==========================  ==============================
root script / module     installed command           module
=======================  ==========================  ==============================
``train_psa.py``         ``psalign-train``           :mod:`psalign.cli.train_psa`
``train_safetydpo.py``   ``psalign-train-safetydpo`` :mod:`psalign.cli.train_safetydpo`
``infer.py``             ``psalign-infer``           :mod:`psalign.cli.infer`
``evaluate.py``          ``psalign-eval``            :mod:`psalign.cli.evaluate`
``launchers/*.sh``       ``psalign-launch``          :mod:`psalign.cli.launch`
=======================  ==========================  ==============================

Each module also runs as ``python -m psalign.cli.<name>`` (``python -m psalign.cli.infer --help``).

Exit status everywhere: 0 done, 2 refused inputs (one readable message, no traceback), 130
interrupted (what was written is kept; rerun to resume). The common flags share one spelling:
``--pretrained_model`` (the base pipeline), ``--output_dir`` (the folder written),
``--embeds_folder`` (user embeddings), ``--prompts`` (a prompts file) and ``--adapter`` (a PSA
adapter); the published scripts' names (``--sd_model``, ``--save_path``, ``--meta_data``,
``--psa_path``) are accepted aliases.
"""
