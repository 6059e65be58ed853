"""arc-dist: distributed ARC compression of Transformer encoders (stage 1 relation distillation, stage 2 replacement)."""

__version__ = "0.1.0"
