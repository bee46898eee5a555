"""Attribution shared by the inline proxy and the hooks: who a request is for, whether it is
admitted, and what it is charged once answered."""
