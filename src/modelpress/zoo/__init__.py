"""Real models and data that work offline: minilm, digits-cnn, silero-vad."""

from modelpress.zoo.base import ZooEntry, get_entry, register_entry, zoo_names

__all__ = ["ZooEntry", "get_entry", "register_entry", "zoo_names"]
