"""Real-QEMU differential harness: QMP client, guest images, launcher and the golden matrix."""
