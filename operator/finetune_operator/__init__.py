"""kopf operator for CharacterFineTune resources."""
