"""The SOLOv2 network and its training: the meta-architecture (registered in detectron2's
``META_ARCH_REGISTRY``), the ResNet-FPN backbone, the two heads, target assignment, the losses,
and how an inference batch runs through the network."""
