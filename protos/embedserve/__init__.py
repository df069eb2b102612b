"""embedserve: the input stage of a GPT-style model as a gRPC service.

`embedserve.v1` holds the generated protocol, `embedserve.client` the client
SDK and `embedserve.server` the server.
"""

__version__ = "0.1.0"
