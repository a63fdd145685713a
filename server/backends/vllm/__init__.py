"""``talora-serve --backend vllm``: the engine, its inputs to vLLM, and the vLLM child process."""
