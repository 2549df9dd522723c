"""modules/sd_vae.py: the VAE list, name -> path."""

vae_dict: dict[str, str] = {}
refreshes = 0


def refresh_vae_list():
    global refreshes
    refreshes += 1


loaded_vae_file = None  # the webui's path of a VAE chosen in settings, None for the checkpoint's own
