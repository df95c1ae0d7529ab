"""Signing in to a mail server: shared by the mail sources (POP3 now, IMAP next) and, later, hosted destinations.

Plain modules, not a registered plugin (no hooks here); a plugin imports the ones it needs:

- `settings`: the sign-in keys of an account (``auth``, and exactly one secret: ``password``, ``password_file``,
  ``password_command``, ``password_env``, ``token_command`` or ``oauth2``), read without any network code;
- `passwords`: where a password comes from, resolved at connect time;
- `oauth2_settings`: an account's ``oauth2:`` section and the provider presets (no HTTP code);
- `oauth2`: access tokens from a ``token_command`` or refreshed at the provider's token endpoint;
- `authorize`: the one-time authorization (``postbote auth``) that stores a refresh token;
- `sasl`: the SASL mechanisms and the choice of a safe one (``auth: auto``).
"""
