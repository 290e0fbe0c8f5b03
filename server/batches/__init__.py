"""OpenAI's Files and Batch APIs: JSONL jobs over one or several variants, run through the relay."""
