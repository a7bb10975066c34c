"""Research instruments, not part of what users run: ``image_probe`` (the image-branch gate on the named world),
``instance_probe`` (the gate on held-out instances), ``oracle`` (a supervised ResNet, the gate's upper bound),
``calibration`` (the pixel metric's threshold and reference rows), ``core_probe`` (what an encoder's cores
carry: the instance or the noise draw)."""
