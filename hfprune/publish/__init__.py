"""Model cards (rendered from model_cards/ templates), their provenance and results sections."""
