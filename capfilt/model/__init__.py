"""The MED and its checkpoints: tokenizer.py (captions → ids), losses.py (ITC/ITM/LM, pure functions),
med.py (the model, momentum encoders, queues), hf.py (MED checkpoints, HF exports and the one loader),
info.py (parameter counts), testing.py (tiny seeded fixtures). Import the submodule you need."""
