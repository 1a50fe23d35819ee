"""The policy's vLLM backend: the only code of the service that imports vLLM.

- engine.py: `VllmEngine`, the Engine protocol on vLLM's AsyncLLM (in-process, DESIGN.md
  decision 1);
- cpu_lora.py: LoRA ops for vLLM's CPU build, swapped in at start-up in lora mode;
- merge.py: merged adapter mode inside the vLLM worker (fold an adapter into the weights);
- stat_logger.py: copies vLLM's scheduler figures into the policy's gauges.

cpu_lora.py and merge.py run in the engine process (through `collective_rpc`, cloudpickled by
reference), so they import only what that process has.
"""
