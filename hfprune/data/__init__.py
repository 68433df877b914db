"""Text: dataset specs turned into texts and token windows, the built-in corpora, the offline demo assets."""
