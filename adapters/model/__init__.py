"""The frozen LM (``frozen_lm``, ``loading``, ``config``, ``precision``) and TA-LoRA on it (``talora_model``)."""
