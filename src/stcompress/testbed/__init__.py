"""A small real audio-LLM testbed (issue 10): Whisper-base encoder + Gemma 3 270M in a
Qwen2AudioForConditionalGeneration, with human EN->DE / EN->ZH text spoken by TTS voices.

Everything is rebuilt from registry parts (PyPI, Debian); no Gemma or Whisper weight is shipped.
`python -m stcompress.testbed --help` lists the commands; benchmarks/testbed/README.md the plan.
"""
