"""Model families that timm does not ship, registered in timm's own registry on import."""

from service.engine.models import cifar_resnet, cifar_vit

__all__ = ["cifar_resnet", "cifar_vit"]
