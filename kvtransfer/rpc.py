"""The KV channel's gRPC service name, which the sender's stubs and the receiver's handlers
must spell the same way (methods and messages in `proto/kvtransfer.proto`)."""

SERVICE = "pdserve.kvtransfer.v1.KVTransfer"
