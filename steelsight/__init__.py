"""steelsight: live steel-strip defect inspection."""
