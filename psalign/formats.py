"""File names of psalign's on-disk formats, in one light module (no torch import).

The modules that write each format import their name from here, and so do the places that only
need to find or copy the files (the toy bundle, the inference input checks).
"""

#: PSA adapter folder: its :class:`~psalign.adapter.adapter.PSAAdapterConfig` as JSON.
PSA_CONFIG_NAME = "psa_config.json"
#: PSA adapter folder: the adapter's ``state_dict``.
PSA_WEIGHTS_NAME = "psa_adapter.safetensors"
#: A diffusers LoRA folder (SafetyDPO experts and their merge), as ``load_lora_weights`` reads it.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Beside a Co-Merged LoRA: the SVD approximation error per module.
MERGE_REPORT_NAME = "merge_report.json"
#: Beside a trained LoRA (a SafetyDPO expert): its training arguments and step, as JSON.
TRAINING_INFO_NAME = "training_info.json"
