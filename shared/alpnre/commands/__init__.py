"""Sub-commands of ``alpnre`` that live in their own modules (see ``alpnre.cli``)."""
