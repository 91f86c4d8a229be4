"""Where the generated protos live: the stubs are the `medimg.*` packages beside this one."""

from pathlib import Path

#: The FileDescriptorSet of every medimg proto and its imports, for Envoy's transcoder.
DESCRIPTOR_SET_PATH = Path(__file__).with_name("descriptor_set.binpb")
