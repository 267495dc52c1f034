"""Loading models crvlm can run offline (directories, the SmolLM2 GGUF) and their processors.
"""
