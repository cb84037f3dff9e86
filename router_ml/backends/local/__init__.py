"""Local model servers (vLLM, llama.cpp): launch blocks, start / wait / stop by PID, models up/down."""
