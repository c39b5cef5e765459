"""streamvox: a streaming-centric serving engine for speech language models."""
