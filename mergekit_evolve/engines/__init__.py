"""Generation engines behind lm-eval: a warm vLLM engine whose weights are swapped
per candidate (:mod:`.vllm_engine`), and a generation toy it can serve on CPU
(:mod:`.gen_toy`). Nothing heavy is imported here."""
