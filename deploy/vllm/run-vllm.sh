#!/usr/bin/env bash
# vLLM and the agent on one GPU host, without containers.
#   pip install vllm            (in its own virtual environment: it pins its own torch)
#   deploy/vllm/run-vllm.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-Qwen/Qwen2.5-1.5B-Instruct}
export VLLM_API_KEY=${VLLM_API_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
VLLM=${VLLM:-vllm}

"$VLLM" serve "$MODEL" --served-model-name summariser --host 127.0.0.1 --port 8000 \
    --max-model-len 4096 --gpu-memory-utilization 0.85 &
vllm_pid=$!
trap 'kill "$vllm_pid" 2>/dev/null || true' EXIT

# the agent starts even if vLLM is still loading: profiles are heuristic until it answers
sed 's#http://vllm:8000/v1#http://127.0.0.1:8000/v1#' deploy/vllm/agent.toml > "${TMPDIR:-/tmp}/recsys-agent-vllm.toml"
.venv/bin/recsys-agent run --config "${TMPDIR:-/tmp}/recsys-agent-vllm.toml"
