"""Neural-network building blocks shared by the learned agents: relative-pose attention over gathered
neighbours (``attention``), map pieces (``map_pieces``) and the map encoder (``map_encoder``)."""
