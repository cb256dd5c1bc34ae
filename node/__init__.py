"""rollshare: a peer-to-peer node for RL post-training of language models."""
__version__ = "0.1.0"
