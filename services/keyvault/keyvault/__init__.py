"""keyvault: provider API keys encrypted at rest (AES-256-GCM), served as gRPC
``influence.v1.KeyVault``.

Callers use the generated stub (``influence.v1.keyvault_pb2_grpc.KeyVaultStub``) and send their
own token (their KEYVAULT_TOKEN) as gRPC metadata ``x-caller-token`` on every call; keyvault
knows the callers from KEYVAULT_CALLER_TOKENS (``name=token,...``). Only ``compute-runpod`` may
call RevealKey. See keyvault.crypto for the master keys, their versions and rotation, and
keyvault.server for the status codes.
"""
