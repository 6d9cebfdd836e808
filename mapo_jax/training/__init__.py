"""The training core: the train step, the objectives, what a config compiles (build), the optimizer, LoRA adapters and TPU slices."""
