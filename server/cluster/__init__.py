"""deltagate on Ray Serve: the OpenAI front as the ingress, one vLLM engine per replica (serve --ray)."""
